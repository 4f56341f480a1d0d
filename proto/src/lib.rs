//! Wire protocols. Generated code lands here (see `build.rs` once the protos exist).
