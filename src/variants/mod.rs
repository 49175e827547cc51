//! The built-in variants, each written with the DSL itself.
