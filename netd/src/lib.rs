//! Network slots and eBPF dataplane (not built yet: no issue has asked for it).
