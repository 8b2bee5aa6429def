//! moat-store (being written).
