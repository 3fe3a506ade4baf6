"""Starting graphs from the command line: the shipped dataflows, the server graph of any
models, run folders and records (`omni serve`, `omni voice`, `omni robot`, `omni init`,
`omni ps`)."""
