//! moat-audit (being written).
