"""The HTTP request path: middlewares, routes, validation, answers, request ids, error answers."""
