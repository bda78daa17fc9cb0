"""One module per stage; each is a function from (recipe, artifacts on disk) to artifacts on disk."""
