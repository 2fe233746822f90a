"""knoxd: the per-host Knox daemon (cache, upstream refresher, socket API)."""
