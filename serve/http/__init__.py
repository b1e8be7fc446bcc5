"""The HTTP face of the daemon: gates, routes and the event stream, on Quart-Trio."""
