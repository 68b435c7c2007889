//! Device-side client state machine (being written).
