"""Digital phantoms (organs, lesions, CT) and simulated PET/CT cases made from them with the physics."""
