//! Legacy port-I/O devices: COM1 (vm-superio 8250), i8042 (reset), the Grove boot-timer,
//! identity, generation and idle ports, and harmless answers for probe ports.
//!
//! Port map:
//! | port          | device                                                        |
//! |---------------|---------------------------------------------------------------|
//! | 0x3f8-0x3ff   | COM1 8250 UART, IRQ 4 (irqfd)                                 |
//! | 0x60, 0x64    | i8042: 0xFE to 0x64 resets the guest (grove-vmm exits 0)      |
//! | 0x440         | boot timer: byte 123 logs the time since VMM start            |
//! | 0x444         | Grove identity (32-bit IN), from the config, 0 on fresh boot  |
//! | 0x448         | Grove restore generation (32-bit IN), +1 on every restore     |
//! | 0x44c         | Grove idle: IN reads [`IDLE_MAGIC`]; OUT of N sleeps the vCPU |
//! |               | thread N us (at most [`IDLE_MAX_US`]); stateless              |
//! | 0x70-0x71     | CMOS: reads 0                                                 |
//! | anything else | reads all ones, writes ignored (0x80, 0xed, 0xcf8-0xcff, ...) |
//!
//! The PIC, PIT and IOAPIC are KVM's in-kernel ones, so their ports never exit here.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;
/// Boot-timer port.
pub const BOOT_TIMER: u16 = 0x440;
/// The byte the guest writes to the boot-timer port.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// Identity port.
pub const IDENTITY: u16 = 0x444;
/// Restore-generation port.
pub const GENERATION: u16 = 0x448;
/// Idle port: a guest that cannot `hlt` (the test guest runs at CPL 3) sleeps here.
pub const IDLE: u16 = 0x44c;
/// What a 32-bit IN from the idle port reads ("GROV"), so a guest can detect it (an unknown
/// port reads all ones in grove-vmm; other VMMs answer something else).
pub const IDLE_MAGIC: u32 = 0x4752_4f56;
/// Longest sleep one OUT to the idle port asks for (microseconds); larger values clamp.
pub const IDLE_MAX_US: u32 = 1000;

/// Errors from the devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The serial output file cannot be opened.
    #[error("cannot open serial output {path}")]
    SerialFile {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// Saved serial state is invalid.
    #[error("bad saved serial state: {0}")]
    SerialState(String),
}

/// Where guest serial output goes. Unbuffered: every byte reaches the sink when written.
#[derive(Debug)]
pub enum SerialOut {
    /// The VMM's stdout.
    Stdout,
    /// A file (created or truncated).
    File(File),
    /// Discarded.
    Sink,
}

impl SerialOut {
    /// `stdout` or a path.
    pub fn open(spec: &str) -> Result<Self, DeviceError> {
        if spec == "stdout" {
            return Ok(Self::Stdout);
        }
        File::create(spec)
            .map(Self::File)
            .map_err(|source| DeviceError::SerialFile { path: spec.to_string(), source })
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Output errors (a closed pipe, a full disk) must not stop the guest: drop the bytes.
        let _ = match self {
            Self::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(buf).and_then(|()| out.flush())
            }
            Self::File(f) => f.write_all(buf),
            Self::Sink => Ok(()),
        };
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An interrupt line: an eventfd KVM turns into a GSI (irqfd).
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042's reset line: sets a flag the vCPU loop checks after the port write.
#[derive(Debug, Clone, Default)]
pub struct ResetLine(pub Arc<AtomicBool>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The UART type used for COM1.
pub type Com1 = Serial<IrqLine, NoEvents, SerialOut>;

/// What the vCPU loop must do after a port access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortAction {
    /// Nothing, keep running.
    Continue,
    /// The guest asked for a reset: stop the VM with status 0.
    Reset,
    /// The guest is idle: the vCPU thread sleeps this long (at most [`IDLE_MAX_US`]) before
    /// it re-enters the guest, waking early for a pause.
    Idle(Duration),
}

/// Saved state of the port devices (`Persist`-style: runtime objects vs saved state).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    /// COM1 registers, in the order of vm-superio's `SerialState`.
    pub serial_regs: [u8; 9],
    /// COM1 receive FIFO.
    pub serial_in: Vec<u8>,
    /// Restore generation at save time.
    pub generation: u32,
}

/// All port-I/O devices.
#[derive(Debug)]
pub struct PortBus {
    serial: Mutex<Com1>,
    i8042: Mutex<I8042Device<ResetLine>>,
    reset: ResetLine,
    start: Instant,
    identity: AtomicU32,
    generation: AtomicU32,
    /// Time of the first boot-timer write (ms since start), for tests and benches.
    pub boot_timer_log: Mutex<Option<f64>>,
    first_output: AtomicBool,
}

impl PortBus {
    /// Builds the bus. `start` is the VMM start time the boot timer measures from.
    pub fn new(out: SerialOut, irq: EventFd, start: Instant, identity: u32) -> Self {
        let reset = ResetLine::default();
        Self {
            serial: Mutex::new(Serial::new(IrqLine(irq), out)),
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
            start,
            identity: AtomicU32::new(identity),
            generation: AtomicU32::new(0),
            boot_timer_log: Mutex::new(None),
            first_output: AtomicBool::new(false),
        }
    }

    /// Handles an IN: fills `data`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1..=0x3ff => {
                let off = u8::try_from(port - COM1).unwrap_or(0);
                let v = lock(&self.serial).read(off);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            I8042_DATA | I8042_CMD => {
                let v = lock(&self.i8042).read(0);
                data.fill(v);
            }
            IDENTITY => fill_le(data, self.identity.load(Ordering::SeqCst)),
            GENERATION => fill_le(data, self.generation.load(Ordering::SeqCst)),
            IDLE => fill_le(data, IDLE_MAGIC),
            0x70 | 0x71 => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// Handles an OUT.
    pub fn io_out(&self, port: u16, data: &[u8]) -> PortAction {
        if port == IDLE {
            return PortAction::Idle(idle_duration(data));
        }
        let Some(&b) = data.first() else {
            return PortAction::Continue;
        };
        match port {
            COM1..=0x3ff => {
                let off = u8::try_from(port - COM1).unwrap_or(0);
                if off == 0 && !self.first_output.swap(true, Ordering::Relaxed) {
                    crate::timing::mark("first guest serial output");
                }
                // A failed interrupt injection cannot be reported to the guest; output goes on.
                let _ = lock(&self.serial).write(off, b);
            }
            I8042_DATA | I8042_CMD => {
                let off = u8::try_from(port - I8042_DATA).unwrap_or(0);
                let _ = lock(&self.i8042).write(off, b);
                if self.reset.0.swap(false, Ordering::SeqCst) {
                    return PortAction::Reset;
                }
            }
            BOOT_TIMER if b == BOOT_TIMER_MAGIC => {
                let ms = self.start.elapsed().as_secs_f64() * 1000.0;
                eprintln!("boot-timer: guest ready {ms:.3} ms after VMM start");
                lock(&self.boot_timer_log).get_or_insert(ms);
            }
            _ => {}
        }
        PortAction::Continue
    }

    /// Sets the identity returned on port 0x444.
    pub fn set_identity(&self, v: u32) {
        self.identity.store(v, Ordering::SeqCst);
    }

    /// The identity returned on port 0x444.
    pub fn identity(&self) -> u32 {
        self.identity.load(Ordering::SeqCst)
    }

    /// The generation returned on port 0x448.
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Sets the generation returned on port 0x448.
    pub fn set_generation(&self, v: u32) {
        self.generation.store(v, Ordering::SeqCst);
    }

    /// Saves the device state.
    pub fn save(&self) -> DevicesState {
        let s = lock(&self.serial).state();
        DevicesState {
            serial_regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            serial_in: s.in_buffer,
            generation: self.generation.load(Ordering::SeqCst),
        }
    }

    /// Rebuilds the bus from saved state (generation as saved; the caller bumps it).
    pub fn restore(
        state: &DevicesState,
        out: SerialOut,
        irq: EventFd,
        start: Instant,
        identity: u32,
    ) -> Result<Self, DeviceError> {
        let r = state.serial_regs;
        let ss = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.serial_in.clone(),
        };
        let serial = Serial::from_state(&ss, IrqLine(irq), NoEvents, out)
            .map_err(|e| DeviceError::SerialState(e.to_string()))?;
        let bus = Self::new(SerialOut::Sink, dummy_evt()?, start, identity);
        *lock(&bus.serial) = serial;
        bus.set_generation(state.generation);
        Ok(bus)
    }
}

fn dummy_evt() -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

/// The sleep an OUT of `data` (little endian, 1-4 bytes) to the idle port asks for, clamped to
/// [`IDLE_MAX_US`].
fn idle_duration(data: &[u8]) -> Duration {
    let mut le = [0u8; 4];
    for (d, s) in le.iter_mut().zip(data) {
        *d = *s;
    }
    let us = u32::from_le_bytes(le).min(IDLE_MAX_US);
    Duration::from_micros(u64::from(us))
}

fn fill_le(data: &mut [u8], v: u32) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = v.to_le_bytes().get(i).copied().unwrap_or(0);
    }
}

/// Locks a device mutex; a poisoned lock (a panicking vCPU thread) still yields the device.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> PortBus {
        PortBus::new(SerialOut::Sink, EventFd::new(0).unwrap(), Instant::now(), 7)
    }

    #[test]
    fn i8042_reset_is_reported_once() {
        let b = bus();
        assert_eq!(b.io_out(I8042_CMD, &[0x01]), PortAction::Continue);
        assert_eq!(b.io_out(I8042_DATA, &[0xfe]), PortAction::Continue);
        assert_eq!(b.io_out(I8042_CMD, &[0xfe]), PortAction::Reset);
        assert_eq!(b.io_out(I8042_CMD, &[0x00]), PortAction::Continue);
    }

    #[test]
    fn identity_generation_and_probe_ports() {
        let b = bus();
        let mut d = [0u8; 4];
        b.io_in(IDENTITY, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
        b.set_generation(3);
        b.io_in(GENERATION, &mut d);
        assert_eq!(u32::from_le_bytes(d), 3);
        b.io_in(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut one = [9u8];
        b.io_in(0x71, &mut one);
        assert_eq!(one, [0]);
        assert_eq!(b.io_out(0x80, &[1]), PortAction::Continue);
        assert_eq!(b.io_out(0xcf8, &[]), PortAction::Continue);
    }

    #[test]
    fn idle_port_reads_the_magic_and_clamps_sleeps() {
        let b = bus();
        let mut d = [0u8; 4];
        b.io_in(IDLE, &mut d);
        assert_eq!(u32::from_le_bytes(d), IDLE_MAGIC);
        assert_eq!(&d, b"VORG", "\"GROV\" as a little-endian u32");
        let us = |n: u32| b.io_out(IDLE, &n.to_le_bytes());
        assert_eq!(us(0), PortAction::Idle(Duration::ZERO));
        assert_eq!(us(40), PortAction::Idle(Duration::from_micros(40)));
        assert_eq!(us(IDLE_MAX_US), PortAction::Idle(Duration::from_micros(1000)));
        assert_eq!(us(IDLE_MAX_US + 1), PortAction::Idle(Duration::from_micros(1000)));
        assert_eq!(us(u32::MAX), PortAction::Idle(Duration::from_micros(1000)));
        // Narrower writes are zero-extended; an empty one asks for no sleep.
        assert_eq!(b.io_out(IDLE, &[200]), PortAction::Idle(Duration::from_micros(200)));
        assert_eq!(b.io_out(IDLE, &[0x10, 0x02]), PortAction::Idle(Duration::from_micros(528)));
        assert_eq!(b.io_out(IDLE, &[]), PortAction::Idle(Duration::ZERO));
        // Stateless: nothing in the saved state changes, and a restored bus answers the same.
        let s = b.save();
        let r = PortBus::restore(&s, SerialOut::Sink, EventFd::new(0).unwrap(), Instant::now(), 0)
            .unwrap();
        r.io_in(IDLE, &mut d);
        assert_eq!(u32::from_le_bytes(d), IDLE_MAGIC);
        assert_eq!(r.save(), s);
    }

    #[test]
    fn boot_timer_logs_only_the_magic_byte() {
        let b = bus();
        b.io_out(BOOT_TIMER, &[1]);
        assert!(b.boot_timer_log.lock().unwrap().is_none());
        b.io_out(BOOT_TIMER, &[BOOT_TIMER_MAGIC]);
        assert!(b.boot_timer_log.lock().unwrap().is_some());
    }

    #[test]
    fn serial_state_round_trips() {
        let b = bus();
        b.io_out(COM1 + 3, &[0x80]); // DLAB
        b.io_out(COM1, &[0x0c]);
        b.io_out(COM1 + 3, &[0x03]);
        b.io_out(COM1 + 7, &[0x5a]); // scratch
        b.set_generation(2);
        let s = b.save();
        let r = PortBus::restore(&s, SerialOut::Sink, EventFd::new(0).unwrap(), Instant::now(), 0)
            .unwrap();
        assert_eq!(r.save(), s);
        let mut d = [0u8];
        r.io_in(COM1 + 7, &mut d);
        assert_eq!(d, [0x5a]);
    }
}
