"""Auth schemes: how credentials go on a request, and what answers mean for them."""
