//! The node agent (not built yet: no issue has asked for it).
