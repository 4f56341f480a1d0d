//! Devices: the I/O bus the vCPUs dispatch to ([`bus`]), the legacy port devices
//! ([`legacy`]: COM1, i8042, Grove's ports, ACPI power management), virtio over MMIO
//! ([`virtio`]: the transport, the device trait, interrupts, and one folder per device), and
//! the [`manager`] that allocates addresses and interrupt lines, wires devices to KVM and the
//! event loop, describes them to the guest (ACPI, command line) and saves and restores them.

pub mod bus;
pub mod legacy;
pub mod manager;
pub mod virtio;

/// Locks a device mutex; a poisoned lock (a thread that panicked holding it) still yields the
/// device.
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
