"""Development harness: launchers, load generator, test bundles, benchmarks. Not shipped."""
