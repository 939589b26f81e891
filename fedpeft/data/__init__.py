"""Site data: the embedded clinical-notes generator, file loaders and non-IID partitions."""
