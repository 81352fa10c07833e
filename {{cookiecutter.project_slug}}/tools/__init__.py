"""The project's own programs, outside the package: run one from the project folder as
`python -m tools.NAME`, import one as `tools.NAME` (pytest puts the folder on sys.path)."""
