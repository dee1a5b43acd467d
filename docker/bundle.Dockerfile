# syntax=docker/dockerfile:1
# A serving bundle as an image: the Kubernetes Deployment copies it into the pod with an
# initContainer (k8s/deployment.yaml), so the bundle version is part of the pod spec and rolls out,
# and back, like any image. Build it with the bundle folder as the context:
#
#     docker build -f docker/bundle.Dockerfile -t REGISTRY/mml-recall-bundle:VERSION artifacts/bundles/VERSION
#
# The service checks the manifest's sha256 of every file when it loads the bundle.
FROM busybox:1.37
# Owned by the pods' user, so the copy works whatever modes the files had on the build machine.
COPY --chown=10001:10001 . /bundle
USER 10001:10001
# The initContainer's copy step (k8s/deployment.yaml runs the same command).
CMD ["cp", "-R", "/bundle/.", "/srv/bundle/"]
