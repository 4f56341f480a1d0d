//! COM1: vm-superio's 8250 UART at 0x3f8, interrupt line 4 through an irqfd. Output is
//! unbuffered: every byte reaches stdout or the file when the guest writes it. No input.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::Persist;

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// COM1's ports.
pub const COM1_LEN: u16 = 8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Errors of the serial port.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output file cannot be opened.
    #[error("cannot open serial output {path}")]
    File {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Saved state the UART refuses (a receive FIFO over its size).
    #[error("bad saved serial state")]
    State(#[source] vm_superio::serial::Error<std::io::Error>),
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
    pub fn open(spec: &str) -> Result<Self, SerialError> {
        if spec == "stdout" {
            return Ok(Self::Stdout);
        }
        File::create(spec)
            .map(Self::File)
            .map_err(|source| SerialError::File { path: spec.to_string(), source })
    }
}

/// Guest serial bytes dropped because the sink refused them (a closed pipe, a full disk),
/// since the process started. One VMM per process: a process-wide count.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Guest serial bytes dropped so far because the output refused them.
pub fn dropped_bytes() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Counts `n` dropped bytes; the first drop is reported on stderr, once.
fn drop_output(n: usize, e: &std::io::Error) {
    if DROPPED.fetch_add(n as u64, Ordering::Relaxed) == 0 {
        crate::errln!(
            "grove-vmm: serial output failed ({e}); guest output is dropped from now on (counted, \
             reported at exit)"
        );
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Output errors (a closed pipe, a full disk) must not stop the guest: drop the bytes,
        // count them.
        let r = match self {
            Self::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(buf).and_then(|()| out.flush())
            }
            Self::File(f) => f.write_all(buf),
            Self::Sink => Ok(()),
        };
        if let Err(e) = r {
            drop_output(buf.len(), &e);
        }
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

/// The UART type used for COM1.
pub type Com1 = Serial<IrqLine, NoEvents, SerialOut>;

/// COM1 on the port bus.
#[derive(Debug)]
pub struct SerialDevice {
    uart: Com1,
    first_output: bool,
}

impl SerialDevice {
    /// A fresh UART writing to `out`, interrupting through `irq`.
    pub fn new(out: SerialOut, irq: EventFd) -> Self {
        Self { uart: Serial::new(IrqLine(irq), out), first_output: false }
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let v = self.uart.read(u8::try_from(offset).unwrap_or(0));
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn pio_write(&mut self, _: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        let off = u8::try_from(offset).unwrap_or(0);
        if off == 0 && !self.first_output {
            self.first_output = true;
            crate::timing::mark("first guest serial output");
        }
        // A failed interrupt injection cannot be reported to the guest; output goes on.
        let _ = self.uart.write(off, b);
    }
}

/// COM1's saved registers and receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    /// Registers, in the order of vm-superio's `SerialState`.
    pub regs: [u8; 9],
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
}

/// What restoring COM1 needs.
#[derive(Debug)]
pub struct SerialArgs {
    /// Where output goes.
    pub out: SerialOut,
    /// The interrupt line.
    pub irq: EventFd,
}

impl Persist for SerialDevice {
    type State = SerialState;
    type Args = SerialArgs;
    type Error = SerialError;

    fn save(&self) -> Result<SerialState, SerialError> {
        let s = self.uart.state();
        Ok(SerialState {
            regs: [
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
            in_buffer: s.in_buffer,
        })
    }

    fn restore(args: SerialArgs, state: &SerialState) -> Result<Self, SerialError> {
        let r = state.regs;
        let s = UartState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, IrqLine(args.irq), NoEvents, args.out)
            .map_err(SerialError::State)?;
        Ok(Self { uart, first_output: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn serial_state_round_trips() {
        let mut d = SerialDevice::new(SerialOut::Sink, evt());
        let base = PioAddress(COM1);
        d.pio_write(base, 3, &[0x80]); // DLAB
        d.pio_write(base, 0, &[0x0c]);
        d.pio_write(base, 3, &[0x03]);
        d.pio_write(base, 7, &[0x5a]); // scratch
        let s = d.save().unwrap();
        let mut r =
            SerialDevice::restore(SerialArgs { out: SerialOut::Sink, irq: evt() }, &s).unwrap();
        assert_eq!(r.save().unwrap(), s);
        let mut b = [0u8];
        r.pio_read(base, 7, &mut b);
        assert_eq!(b, [0x5a]);
        // A FIFO over the UART's size is refused, not truncated.
        let bad = SerialState { regs: s.regs, in_buffer: vec![0; 4096] };
        assert!(
            SerialDevice::restore(SerialArgs { out: SerialOut::Sink, irq: evt() }, &bad).is_err()
        );
    }

    #[test]
    fn output_to_a_full_disk_is_dropped_and_counted() {
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            panic!("/dev/full cannot be opened");
        };
        let before = dropped_bytes();
        let mut d = SerialDevice::new(SerialOut::File(full), evt());
        d.pio_write(PioAddress(COM1), 0, b"x");
        d.pio_write(PioAddress(COM1), 0, b"y");
        // The guest's writes succeeded (the UART took them); the sink refused both bytes.
        assert!(dropped_bytes() >= before + 2, "{} -> {}", before, dropped_bytes());
    }

    #[test]
    fn output_raises_the_interrupt_when_enabled() {
        let irq = evt();
        let mut d = SerialDevice::new(SerialOut::Sink, irq.try_clone().unwrap());
        let base = PioAddress(COM1);
        d.pio_write(base, 1, &[0x02]); // IER: THR empty interrupt
        d.pio_write(base, 0, b"x");
        assert!(irq.read().unwrap() >= 1);
    }
}
