"""An agent node's tool loop, whose tools are the graph's own nodes."""
