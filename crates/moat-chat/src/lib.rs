//! moat-chat (being written).
