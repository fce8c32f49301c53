"""Layer 0, configuration: the schema of every setting, its strict loader, every setting's domain,
and the registries' mechanism (``registry.Registry``). Imports nothing else of the package."""
