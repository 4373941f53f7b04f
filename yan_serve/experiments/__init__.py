"""Small, self-contained experiments that check the paper's claims on toy problems."""
