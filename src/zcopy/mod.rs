//! Zero-copy (gntdev dma-buf) and backend-allocation paths. See issue #5.
