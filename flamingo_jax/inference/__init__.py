"""Generation, scoring and prompts for trained Flamingo models."""
