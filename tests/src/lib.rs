//! Test harness: start real backends and real `lbd` processes on ephemeral loopback ports.
