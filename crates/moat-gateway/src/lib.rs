//! moat-gateway (being written).
