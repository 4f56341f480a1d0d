//! Grove's freestanding x86-64 test guest.
//!
//! Booted like a Linux kernel through the 64-bit boot protocol (boot_params in
//! RSI), it leaves CPL 0 after a few instructions (`boot.rs`) and does all of its
//! work natively at CPL 3: it reads its `tg.*` command line and the e820 map from
//! boot_params, writes and checksums memory, talks to the VMM over I/O ports and
//! prints on COM1. The contract with the VMM is in `README.md`.

#![no_std]
#![no_main]

mod blk;
mod boot;
mod io;
mod rng;

use grove_testguest::bootparams::Idle;
use grove_testguest::bootparams::{BootParams, Config, E820Entry, Mode, E820_MAX};
use grove_testguest::pace;
use grove_testguest::region::{self, Region, RegionError};
use io::{inl, outb, outl, rdtsc, Serial};

/// TSC frequency assumed when neither `tg.tsc_khz` nor CPUID gives one.
const DEFAULT_TSC_KHZ: u64 = 2_500_000;

/// Entered at CPL 3 from the boot stub with the boot_params address.
#[no_mangle]
pub extern "C" fn rust_main(boot_params: u64) -> ! {
    let bp = match BootParams::new(boot_params) {
        Ok(bp) => bp,
        Err(e) => fail(e),
    };
    let cfg = match Config::parse(bp.cmdline()) {
        Ok(c) => c,
        Err(e) => fail(e),
    };
    let mut e820 = [E820Entry::default(); E820_MAX];
    let n = bp.e820(&mut e820);
    let e820 = &e820[..n];
    let tsc_khz = cfg.tsc_khz.or_else(io::tsc_khz_from_cpuid).unwrap_or(DEFAULT_TSC_KHZ);
    let mut rng = cfg.rng.then(|| rng_init(&cfg, tsc_khz));
    let mut blk = cfg.blk.then(|| blk_init(&cfg, tsc_khz));

    match cfg.mode {
        Mode::Hello => {
            print!("hello from the grove test guest (cpl3, {} e820 entries)\n", n);
            io::reset()
        }
        Mode::TripleFault => {
            print!("tg: triple fault requested\n");
            io::triple_fault()
        }
        Mode::Checksum => {
            let region = region_or_fail(e820, &cfg);
            if cfg.verbose {
                print_region(&region);
            }
            region.fill(cfg.seed);
            print!("CHECKSUM=0x{:016x}\n", region.checksum());
            io::reset()
        }
        Mode::Ready | Mode::Fork | Mode::Busy => {
            let region = region_or_fail(e820, &cfg);
            // Only `auto` probes the port (a forced choice needs no read).
            let probe = if cfg.idle == Idle::Auto { inl(io::IDLE) } else { 0 };
            let idle_port = pace::use_idle_port(cfg.idle, cfg.mode, probe);
            if cfg.verbose {
                print!(
                    "tg: mode={:?} region={} bytes in {} chunks seed={} tsc_khz={} t_us={} \
                     identity={} generation={} idle={} idle_us={}\n",
                    cfg.mode,
                    region.bytes(),
                    region.chunks().len(),
                    cfg.seed,
                    tsc_khz,
                    cfg.t_us,
                    inl(io::IDENTITY),
                    inl(io::GENERATION),
                    if idle_port { "port" } else { "spin" },
                    cfg.idle_us
                );
                print_region(&region);
            }
            region.fill(cfg.seed);
            outb(io::BOOT_TIMER, io::BOOT_TIMER_MAGIC);
            if let Some(addr) = cfg.mmio_boot_timer {
                io::mmio_write8(addr, io::BOOT_TIMER_MAGIC);
            }
            Serial::write_bytes(b"READY\n");
            let t_us = if idle_port { cfg.idle_us } else { cfg.t_us };
            let pacing = Pacing { tsc_khz, period: tsc_khz * t_us / 1000, idle_port };
            t_loop(&region, cfg.mode, pacing, Drivers { rng: rng.as_mut(), blk: blk.as_mut() })
        }
    }
}

/// Sets the virtio-rng up and makes one request (printed), or fails the guest.
fn rng_init(cfg: &Config, tsc_khz: u64) -> rng::RngDriver {
    let Some(base) = cfg.virtio_mmio else {
        fail("tg.rng=1 needs a virtio_mmio.device= on the command line (grove-vmm --rng)")
    };
    let mut d = match rng::RngDriver::init(base) {
        Ok(d) => d,
        Err(e) => fail(e),
    };
    rng_request(&mut d, tsc_khz, true);
    d
}

/// Sets the virtio-blk up and exercises it once (identity 0), or fails the guest.
fn blk_init(cfg: &Config, tsc_khz: u64) -> blk::BlkDriver {
    let Some(base) = cfg.virtio_mmio else {
        fail("tg.blk=1 needs a virtio_mmio.device= on the command line (grove-vmm --disk)")
    };
    let mut d = match blk::BlkDriver::init(base) {
        Ok(d) => d,
        Err(e) => fail(e),
    };
    if let Err(e) = d.exercise(inl(io::IDENTITY), tsc_khz * 5000) {
        fail(e)
    }
    d
}

/// The virtio drivers the `T` loop uses at identity changes.
struct Drivers<'a> {
    rng: Option<&'a mut rng::RngDriver>,
    blk: Option<&'a mut blk::BlkDriver>,
}

/// One virtio-rng request, printed as `RNG n=.. [<hex>]` (the bytes only if `read_back`);
/// a guest with no answer within 5 s fails.
fn rng_request(d: &mut rng::RngDriver, tsc_khz: u64, read_back: bool) {
    match d.request(tsc_khz * 5000, read_back) {
        Ok((len, bytes)) => rng::print_result(len, bytes.as_ref()),
        Err(e) => fail(e),
    }
}

/// How the `T` loop paces itself.
#[derive(Clone, Copy)]
struct Pacing {
    tsc_khz: u64,
    /// TSC ticks between `T`s.
    period: u64,
    /// Sleep through the idle port (else spin).
    idle_port: bool,
}

fn region_or_fail(e820: &[E820Entry], cfg: &Config) -> Region {
    match Region::layout(e820, cfg.touch_mib << 20) {
        Ok(r) => r,
        Err(RegionError::TooSmall) => fail("tg.touch_mib does not fit in the RAM above 16 MiB"),
        Err(RegionError::BeyondMap) => fail("the region reaches past 16 GiB (the guest's map)"),
    }
}

/// Prints the region's chunks: `tg: region 0x<start>+0x<len> ...`.
fn print_region(region: &Region) {
    print!("tg: region");
    for &(start, len) in region.chunks() {
        print!(" {:#x}+{:#x}", start, len);
    }
    print!("\n");
}

/// Prints `T` every `period` TSC ticks, forever. Fork mode checks the identity
/// port before each `T` (and when it changes, with `tg.rng=1` makes a virtio-rng request, with
/// `tg.blk=1` writes, flushes and reads back the identity's block);
/// busy mode dirties pages round robin while it waits.
/// With `idle_port` the wait sleeps through grove-vmm's idle port (the rest of the
/// period in whole µs, so the vCPU thread sleeps instead of spinning), else it spins.
/// A TSC that jumps (pause, restore) yields one `T` at once, never a burst or a
/// long wait.
fn t_loop(region: &Region, mode: Mode, p: Pacing, mut drivers: Drivers<'_>) -> ! {
    let Pacing { tsc_khz, period, idle_port } = p;
    let mut last_id = 0u32;
    let mut pages = region.page_cursor();
    let mut counter = 0u64;
    let mut last = rdtsc();
    loop {
        loop {
            // Busy mode writes before it looks at the clock: at least one page per `T`, even
            // when the vCPU was descheduled for a whole period (a loaded host), so every `T`
            // means progress.
            if mode == Mode::Busy {
                if let Some(page) = pages.next(region) {
                    counter = counter.wrapping_add(1);
                    region::poke_page(page, counter);
                }
            }
            let now = rdtsc();
            // A TSC that went backwards (restore) counts as "due" too.
            if now.wrapping_sub(last) >= period || now < last {
                last = now;
                break;
            }
            if mode != Mode::Busy {
                if idle_port {
                    match pace::sleep_us(period - now.wrapping_sub(last), tsc_khz) {
                        0 => core::hint::spin_loop(),
                        us => outl(io::IDLE, us),
                    }
                } else {
                    core::hint::spin_loop();
                }
            }
        }
        if mode == Mode::Fork {
            let id = inl(io::IDENTITY);
            if id != last_id {
                last_id = id;
                region.fill_first_page(u64::from(id));
                print!("ID={} CHECKSUM=0x{:016x}\n", id, region.checksum());
                if let Some(d) = drivers.rng.as_deref_mut() {
                    // Not read back: the buffer page stays written by the device only.
                    rng_request(d, tsc_khz, false);
                }
                if let Some(d) = drivers.blk.as_deref_mut() {
                    if let Err(e) = d.exercise(id, tsc_khz * 5000) {
                        fail(e)
                    }
                }
            }
        }
        outb(io::COM1, b'T');
    }
}

/// Prints `tg: error: <why>` and triple-faults (the VMM reports the shutdown).
fn fail(why: &str) -> ! {
    print!("tg: error: {}\n", why);
    io::triple_fault()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    print!("tg: panic: {}\n", info);
    io::triple_fault()
}
