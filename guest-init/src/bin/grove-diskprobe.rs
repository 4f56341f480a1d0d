//! `grove-diskprobe DEV [MIB] [OPS]`: a guest-side block device benchmark, static like
//! guest-init so it runs in any guest (the test host's initramfs, a sandbox). One thread,
//! queue depth 1, `O_DIRECT` (the guest's page cache is out of the picture: every request
//! reaches the device). Prints one JSON line per test, prefixed `diskprobe: `:
//!
//! - `seq-write`, `seq-read`: MIB MiB in 1 MiB requests (the write ends with an fdatasync,
//!   counted), MiB/s;
//! - `rand-write-4k`, `rand-read-4k`: OPS requests of 4 KiB at random 4 KiB-aligned offsets
//!   in the first MIB MiB (the write ends with an fdatasync, counted), IOPS, MiB/s and each
//!   request's latency (median, p99, in µs).
//!
//! The device is overwritten. Defaults: 64 MiB, 2000 requests.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

/// A buffer of `len` bytes aligned to a page (O_DIRECT needs it), inside a larger vector.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let buf = vec![fill; len + PAGE];
        let off = buf.as_ptr().align_offset(PAGE);
        Self { buf, off, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// xorshift64*: the random offsets (no dependency, reproducible).
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The `per_mille`-th quantile (nearest rank) of `sorted`, in µs.
fn percentile(sorted: &[Duration], per_mille: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) * per_mille.min(1000) + 500) / 1000;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

fn seq(f: &File, write: bool, mib: u64) -> std::io::Result<String> {
    let mut b = Aligned::new(MIB as usize, 0x5a);
    let t = Instant::now();
    for i in 0..mib {
        if write {
            f.write_all_at(b.get(), i * MIB)?;
        } else {
            f.read_exact_at(b.get(), i * MIB)?;
        }
    }
    if write {
        f.sync_data()?;
    }
    let s = t.elapsed().as_secs_f64();
    let name = if write { "seq-write" } else { "seq-read" };
    Ok(format!(
        "{{\"test\":\"{name}\",\"bs\":{MIB},\"bytes\":{},\"secs\":{s:.6},\"mib_s\":{:.2}}}",
        mib * MIB,
        mib as f64 / s
    ))
}

fn rand(f: &File, write: bool, mib: u64, ops: u64) -> std::io::Result<String> {
    let mut b = Aligned::new(PAGE, 0xa5);
    let mut r = Rand(0x9e37_79b9_7f4a_7c15 ^ u64::from(write));
    let pages = (mib * MIB / PAGE as u64).max(1);
    let mut lat = Vec::with_capacity(ops as usize);
    let t = Instant::now();
    for _ in 0..ops {
        let off = (r.next() % pages) * PAGE as u64;
        let t1 = Instant::now();
        if write {
            f.write_all_at(b.get(), off)?;
        } else {
            f.read_exact_at(b.get(), off)?;
        }
        lat.push(t1.elapsed());
    }
    if write {
        f.sync_data()?;
    }
    let s = t.elapsed().as_secs_f64();
    lat.sort();
    let name = if write { "rand-write-4k" } else { "rand-read-4k" };
    Ok(format!(
        "{{\"test\":\"{name}\",\"bs\":{PAGE},\"ops\":{ops},\"secs\":{s:.6},\"iops\":{:.1},\"mib_s\":{:.2},\"lat_us_p50\":{:.1},\"lat_us_p99\":{:.1}}}",
        ops as f64 / s,
        ops as f64 * PAGE as f64 / MIB as f64 / s,
        percentile(&lat, 500),
        percentile(&lat, 990)
    ))
}

fn run(args: &[String]) -> Result<(), String> {
    let dev = args.first().ok_or("usage: grove-diskprobe DEV [MIB] [OPS]")?;
    let num = |i: usize, d: u64| -> Result<u64, String> {
        args.get(i).map_or(Ok(d), |v| v.parse().map_err(|e| format!("{v}: {e}")))
    };
    let (mib, ops) = (num(1, 64)?, num(2, 2000)?);
    if mib == 0 || ops == 0 {
        return Err("MIB and OPS must be at least 1".into());
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("open {dev} O_DIRECT: {e}"))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let size = if size == 0 {
        // A block device's size: seek to its end.
        use std::io::Seek;
        (&f).seek(std::io::SeekFrom::End(0)).map_err(|e| e.to_string())?
    } else {
        size
    };
    if size < mib * MIB {
        return Err(format!("{dev} has {size} bytes, fewer than {mib} MiB"));
    }
    println!("diskprobe: {{\"device\":\"{dev}\",\"size\":{size},\"mib\":{mib},\"ops\":{ops}}}");
    // (name, random, write), in this order: reads follow the writes that filled the range.
    for (name, random, write) in [
        ("seq-write", false, true),
        ("seq-read", false, false),
        ("rand-write-4k", true, true),
        ("rand-read-4k", true, false),
    ] {
        let line = if random { rand(&f, write, mib, ops) } else { seq(&f, write, mib) };
        println!("diskprobe: {}", line.map_err(|e| format!("{name}: {e}"))?);
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            println!("diskprobe: {{\"error\":\"{}\"}}", e.replace('"', "'"));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_file_and_reports_every_test() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk");
        std::fs::write(&p, vec![0u8; 4 << 20]).unwrap();
        // O_DIRECT needs a filesystem that has it (tmpfs does not): skip the I/O then.
        if OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p).is_err() {
            println!("skipped: no O_DIRECT on {}", d.path().display());
            return;
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .unwrap();
        let l = seq(&f, true, 2).unwrap();
        assert!(l.contains("\"test\":\"seq-write\"") && l.contains("\"bytes\":2097152"), "{l}");
        let l = rand(&f, false, 4, 50).unwrap();
        assert!(l.contains("\"ops\":50") && l.contains("lat_us_p99"), "{l}");
        let mut b = vec![0u8; 4096];
        std::fs::File::open(&p).unwrap().read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, vec![0x5a; 4096], "the sequential write wrote its pattern");
        assert!(run(&["/nonexistent".into()]).is_err());
        assert!(run(&[p.display().to_string(), "0".into()]).is_err());
        assert!(run(&[p.display().to_string(), "8".into()]).unwrap_err().contains("fewer than"));
    }

    #[test]
    fn percentiles_and_alignment() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 500), 51.0);
        assert_eq!(percentile(&v, 990), 99.0);
        assert_eq!(percentile(&[], 500), 0.0);
        let mut a = Aligned::new(8192, 1);
        assert_eq!(a.get().as_ptr() as usize % PAGE, 0);
        assert_eq!(a.get().len(), 8192);
    }
}
