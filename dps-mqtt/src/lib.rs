//! MQTT device endpoint (being written).
