"""Face crops and their exact transforms, seeded geometric and photometric augmentation."""
