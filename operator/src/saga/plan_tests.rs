//! Tests of the pure decision: scenarios and properties.
