"""Load tests of the recall service (`make loadtest`) and the catalogue-scale benchmark (`mml bench`)."""
