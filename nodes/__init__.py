"""The node programs, installed as the package ``mofa_omni_nodes`` with one console script each
(``omni-node``, ``omni-vad``, ...): a dataflow names them with ``path: omni-node``, which every dora
daemon finds on its own PATH. That is what lets one dataflow place nodes on several machines
(relative node paths do not resolve on the daemons of a multi-machine dataflow), and each
``nodes/<name>.py`` still runs as a script by its path."""
