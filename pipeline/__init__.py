"""pipeline: QQ NT databases → normalised messages → training datasets."""
