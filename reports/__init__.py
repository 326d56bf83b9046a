"""Results files and the HTML reports rendered from them (imports neither torch nor mlx)."""
