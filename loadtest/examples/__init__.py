"""Examples of load-testing a plugin handler with MuxUser."""
