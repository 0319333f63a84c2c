"""catdog's library: the modules the numbered steps share. helper.py at the top of the repository is its map: it
lists every module in pipeline order and re-exports what the steps use."""
