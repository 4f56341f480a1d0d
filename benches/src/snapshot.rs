//! `grove-bench snapshot|restore|fork` (not written yet).

pub fn run_snapshot(_args: &[String]) -> Result<(), String> {
    Err("not implemented yet".into())
}

pub fn run_restore(_args: &[String]) -> Result<(), String> {
    Err("not implemented yet".into())
}

pub fn run_fork(_args: &[String]) -> Result<(), String> {
    Err("not implemented yet".into())
}
