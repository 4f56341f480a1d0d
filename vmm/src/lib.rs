//! The Grove VMM library.
