//! The `Persist` shape every saved component follows (style.md §4): the runtime object and
//! its saved state are separate types; `save` turns the first into the second and `restore`
//! rebuilds (or loads) a runtime object from it. Each implementation has a round-trip test in
//! its own module. The state file that gathers them is [`crate::state`].

/// A component whose runtime object can be saved to, and rebuilt from, a plain state type.
///
/// `save` is fallible because some components read their state from KVM (a vCPU, the VM's
/// irqchip); devices held in memory never fail it. `restore` really restores: it returns a
/// runtime object that runs on from the saved state.
pub trait Persist: Sized {
    /// The saved state (plain data, serialisable).
    type State;
    /// What `restore` needs besides the state (file descriptors, guest memory, ...).
    type Args;
    /// Why saving or restoring failed.
    type Error;
    /// Saves the component.
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Rebuilds the component from `state`.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}
