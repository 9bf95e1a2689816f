"""Stage 5: serving a trained run to people: the similarity-search page and its JSON API."""
