"""autoencoder: the KL-regularised image autoencoder that maps images to latents."""
