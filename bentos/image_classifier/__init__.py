"""The image classifier BentoML service folder (copied into each image bento)."""
