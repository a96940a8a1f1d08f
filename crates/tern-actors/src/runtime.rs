//! The actor runtime: WebAssembly modules run by wasmtime, one store per
//! actor, each message on a fuel budget so a runaway actor traps instead of
//! starving its executor, a bounded mailbox, and real pause and resume.
//!
//! # The actor ABI
//! A module exports `memory`, `tern_inbox() -> i32` (where the runtime
//! writes a message, at most [`MAX_MESSAGE`] bytes) and `tern_handle(len:
//! i32) -> i32`, which handles the message and returns the length of the
//! reply it left at the same address (a negative value is the actor's own
//! error code). An actor's state is its linear memory and its exported
//! mutable globals; between messages nothing else may hold state (a C
//! module's stack pointer is back where it started).
//!
//! # Incremental checkpoints
//! The kernel tracks which pages of linear memory the actor writes
//! (userfaultfd write-protect in async mode, see [`tern_vmm::uffd::WriteTracker`]),
//! so a checkpoint after the first carries only those pages and costs what
//! changed. Where the kernel cannot track writes, every checkpoint is full.

use crate::checkpoint::ActorCheckpoint;
use crate::delivery::{Admission, Cursors, Delivery, Envelope, OutOfOrder};
use crate::state::{is_zero, StateDelta, StateHashes, StateImage, PAGE};
use crate::store::LoadedState;
use ed25519_dalek::SigningKey;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tern_proto::{ActorId, TenantId};
use tern_vmm::uffd::WriteTracker;
use thiserror::Error;
use wasmtime::{
    Config, Engine, Global, Instance, Linker, Memory, Module, Mutability, Store, StoreLimits,
    StoreLimitsBuilder, Trap, TypedFunc, Val,
};

/// The largest message (and reply) an actor takes.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Whether an actor keeps state across restarts and moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActorMode {
    /// No checkpoints: a restart or a move starts the actor afresh.
    Ephemeral,
    /// Checkpointed every `checkpoint_interval`, its state bounded.
    Stateful {
        /// How often the executor checkpoints the actor.
        checkpoint_interval: Duration,
        /// The most linear memory the actor may have.
        max_state_size_bytes: u64,
    },
}

/// How an actor runs.
#[derive(Clone, Debug)]
pub struct ActorConfig {
    /// Ephemeral or stateful.
    pub mode: ActorMode,
    /// Fuel (roughly wasm instructions) one message may burn.
    pub fuel_per_message: u64,
    /// Messages queued before senders are refused.
    pub mailbox_capacity: usize,
    /// The tenant it belongs to (`None`: the operator's); it travels with
    /// the actor and the API shows the actor to that tenant alone.
    pub tenant: Option<TenantId>,
}

impl Default for ActorConfig {
    fn default() -> Self {
        Self {
            mode: ActorMode::Stateful {
                checkpoint_interval: Duration::from_secs(10),
                max_state_size_bytes: 256 << 20,
            },
            fuel_per_message: 100_000_000,
            mailbox_capacity: 1024,
            tenant: None,
        }
    }
}

impl ActorConfig {
    /// The memory limit: the stateful bound, or 256 MiB for ephemeral actors.
    pub fn max_memory(&self) -> u64 {
        match self.mode {
            ActorMode::Stateful {
                max_state_size_bytes,
                ..
            } => max_state_size_bytes,
            ActorMode::Ephemeral => 256 << 20,
        }
    }
}

/// What went wrong running an actor.
#[derive(Debug, Error)]
pub enum ActorError {
    /// The module does not compile or lacks the actor ABI.
    #[error("actor module: {0}")]
    Module(String),
    /// Instantiating or calling into wasm failed for a reason not listed below.
    #[error("wasm: {0}")]
    Wasm(#[source] wasmtime::Error),
    /// The message burnt its fuel budget: a runaway actor, stopped.
    #[error("the actor ran out of fuel handling a message")]
    OutOfFuel,
    /// The actor trapped (a bug in the actor, not the executor).
    #[error("the actor trapped: {0}")]
    Trapped(Trap),
    /// The mailbox is full; the sender should retry later.
    #[error("mailbox full ({0} messages)")]
    MailboxFull(usize),
    /// A message or reply over [`MAX_MESSAGE`], or outside linear memory.
    #[error("message of {0} bytes does not fit the actor's inbox")]
    MessageSize(usize),
    /// The actor returned an error code.
    #[error("the actor refused the message (code {0})")]
    Refused(i32),
    /// A message ahead of its sender's order.
    #[error(transparent)]
    OutOfOrder(#[from] OutOfOrder),
    /// A state does not fit this module (size or globals).
    #[error("state does not fit the module: {0}")]
    State(String),
}

fn wasm_error(e: wasmtime::Error) -> ActorError {
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => ActorError::OutOfFuel,
        Some(t) => ActorError::Trapped(*t),
        None => ActorError::Wasm(e),
    }
}

/// The wasm engine an executor shares among its actors.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    /// Modules compiled, by the BLAKE3 of their bytes: an actor that comes
    /// back, or another actor of the same module, is not compiled again
    /// (cranelift takes milliseconds, more than moving a small actor).
    compiled: std::sync::Arc<std::sync::Mutex<HashMap<[u8; 32], ActorModule>>>,
}

/// Modules kept compiled, at most.
const COMPILED_CACHE: usize = 64;

/// A compiled actor module.
#[derive(Clone)]
pub struct ActorModule {
    module: Module,
    /// Names of the exported mutable globals, in export order: the globals
    /// that are part of the state.
    globals: Vec<String>,
}

impl Runtime {
    /// An engine with fuel metering and plain anonymous linear memory (no
    /// copy-on-write images, so the kernel can track writes to it).
    pub fn new() -> Result<Self, ActorError> {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.memory_init_cow(false);
        let engine = Engine::new(&config).map_err(ActorError::Wasm)?;
        Ok(Self {
            engine,
            compiled: std::sync::Arc::default(),
        })
    }

    /// Compiles a module (binary or text) and checks it has the actor ABI;
    /// a module compiled before comes from the cache.
    pub fn compile(&self, wasm: &[u8]) -> Result<ActorModule, ActorError> {
        let key = *blake3::hash(wasm).as_bytes();
        if let Some(m) = self.compiled.lock().expect("cache lock").get(&key) {
            return Ok(m.clone());
        }
        let m = self.compile_new(wasm)?;
        let mut cache = self.compiled.lock().expect("cache lock");
        if cache.len() >= COMPILED_CACHE {
            cache.clear();
        }
        cache.insert(key, m.clone());
        Ok(m)
    }

    fn compile_new(&self, wasm: &[u8]) -> Result<ActorModule, ActorError> {
        let module =
            Module::new(&self.engine, wasm).map_err(|e| ActorError::Module(format!("{e:#}")))?;
        let mut globals = Vec::new();
        let mut abi = [false; 3];
        for export in module.exports() {
            let ty = export.ty();
            match (export.name(), &ty) {
                ("memory", wasmtime::ExternType::Memory(_)) => abi[0] = true,
                ("tern_inbox", wasmtime::ExternType::Func(_)) => abi[1] = true,
                ("tern_handle", wasmtime::ExternType::Func(_)) => abi[2] = true,
                (name, wasmtime::ExternType::Global(g)) if g.mutability() == Mutability::Var => {
                    if !g.content().is_i32()
                        && !g.content().is_i64()
                        && !g.content().is_f32()
                        && !g.content().is_f64()
                    {
                        return Err(ActorError::Module(format!(
                            "exported mutable global `{name}` is not a number"
                        )));
                    }
                    globals.push(name.to_owned());
                }
                _ => {}
            }
        }
        if abi != [true; 3] {
            return Err(ActorError::Module(
                "an actor exports `memory`, `tern_inbox` and `tern_handle`".into(),
            ));
        }
        Ok(ActorModule { module, globals })
    }
}

/// Which pages the actor wrote since the last checkpoint: one kernel
/// tracker per stretch of memory (memory that grows gets a new one).
enum Tracking {
    /// Not checkpointed yet, or the kernel cannot track: the next checkpoint is full.
    None,
    /// Tracking `tracked_bytes` of memory at `base` since checkpoint `since`.
    Kernel {
        base: usize,
        since: u64,
        trackers: Vec<(usize, WriteTracker)>,
        tracked_bytes: usize,
    },
}

/// One live actor.
pub struct Actor {
    id: ActorId,
    config: ActorConfig,
    store: Store<StoreLimits>,
    memory: Memory,
    inbox: usize,
    handle: TypedFunc<i32, i32>,
    globals: Vec<Global>,
    mailbox: VecDeque<Envelope>,
    admission: Admission,
    paused: bool,
    sequence: u64,
    hashes: StateHashes,
    tracking: Tracking,
}

impl Actor {
    /// Starts a fresh actor.
    pub fn start(
        rt: &Runtime,
        module: &ActorModule,
        id: ActorId,
        config: ActorConfig,
    ) -> Result<Self, ActorError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(config.max_memory() as usize)
            .instances(1)
            .build();
        let mut store = Store::new(&rt.engine, limits);
        store.limiter(|l| l);
        store
            .set_fuel(config.fuel_per_message)
            .map_err(ActorError::Wasm)?;
        let linker = Linker::new(&rt.engine);
        let instance = linker
            .instantiate(&mut store, &module.module)
            .map_err(wasm_error)?;
        Self::wire(store, instance, module, id, config)
    }

    fn wire(
        mut store: Store<StoreLimits>,
        instance: Instance,
        module: &ActorModule,
        id: ActorId,
        config: ActorConfig,
    ) -> Result<Self, ActorError> {
        let abi = |e: wasmtime::Error| ActorError::Module(format!("{e:#}"));
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| ActorError::Module("no memory".into()))?;
        let inbox_fn = instance
            .get_typed_func::<(), i32>(&mut store, "tern_inbox")
            .map_err(abi)?;
        let handle = instance
            .get_typed_func::<i32, i32>(&mut store, "tern_handle")
            .map_err(abi)?;
        let globals = module
            .globals
            .iter()
            .map(|n| {
                instance
                    .get_global(&mut store, n)
                    .expect("checked at compile")
            })
            .collect();
        let inbox = inbox_fn.call(&mut store, ()).map_err(wasm_error)? as u32 as usize;
        let actor = Self {
            id,
            config,
            store,
            memory,
            inbox,
            handle,
            globals,
            mailbox: VecDeque::new(),
            admission: Admission::default(),
            paused: false,
            sequence: 0,
            hashes: StateHashes::default(),
            tracking: Tracking::None,
        };
        actor.check_inbox(0)?;
        Ok(actor)
    }

    /// Starts an actor from a checkpointed state; its next checkpoint
    /// follows the state's sequence (and is a delta on it where writes are
    /// tracked), and it goes on from the messages the state had handled.
    pub fn restore(
        rt: &Runtime,
        module: &ActorModule,
        id: ActorId,
        config: ActorConfig,
        from: &LoadedState,
    ) -> Result<Self, ActorError> {
        let image = &from.image;
        let mut actor = Self::blank(
            rt,
            module,
            id,
            config,
            &from.cursors,
            image.globals.len(),
            image.memory.len(),
        )?;
        actor.memory.data_mut(&mut actor.store)[..image.memory.len()]
            .copy_from_slice(&image.memory);
        let hashes = StateHashes::of(actor.memory.data(&actor.store), &image.globals);
        actor.finish_restore(from.sequence, &image.globals, hashes)?;
        Ok(actor)
    }

    /// Starts an actor from a full checkpoint its store verified (`hashes`:
    /// what the store computed), writing only the pages it carries: no
    /// intermediate image, and untouched memory stays untouched.
    pub fn restore_checkpoint(
        rt: &Runtime,
        module: &ActorModule,
        id: ActorId,
        config: ActorConfig,
        c: &ActorCheckpoint,
        hashes: StateHashes,
    ) -> Result<Self, ActorError> {
        let s = &c.state;
        if s.base.is_some() {
            return Err(ActorError::State("a delta is not a whole state".into()));
        }
        let bytes = s.memory_bytes as usize;
        let mut actor = Self::blank(rt, module, id, config, &c.cursors, s.globals.len(), bytes)?;
        // Pages are listed in increasing order (checked on decoding); those
        // not listed are zero in the state, and may hold the module's data
        // segments here.
        let mut listed = s.iter_pages().peekable();
        let memory = &mut actor.memory.data_mut(&mut actor.store)[..bytes];
        for (i, page) in memory.chunks_mut(PAGE).enumerate() {
            match listed.peek() {
                Some(&(p, data)) if p as usize == i => {
                    page.copy_from_slice(data);
                    listed.next();
                }
                _ if !is_zero(page) => page.fill(0),
                _ => {}
            }
        }
        actor.finish_restore(c.sequence, &s.globals, hashes)?;
        Ok(actor)
    }

    /// A new instance ready to take a state of `memory_bytes` and
    /// `globals` globals, with the senders' cursors.
    fn blank(
        rt: &Runtime,
        module: &ActorModule,
        id: ActorId,
        config: ActorConfig,
        cursors: &Cursors,
        globals: usize,
        memory_bytes: usize,
    ) -> Result<Self, ActorError> {
        let mut actor = Self::start(rt, module, id, config)?;
        actor.admission = Admission::from_cursors(cursors.clone());
        if globals != actor.globals.len() {
            return Err(ActorError::State(format!(
                "{globals} globals for a module with {}",
                actor.globals.len()
            )));
        }
        if memory_bytes < actor.memory.data_size(&actor.store) {
            return Err(ActorError::State("memory smaller than the module's".into()));
        }
        actor.grow_to(memory_bytes)?;
        Ok(actor)
    }

    fn finish_restore(
        &mut self,
        sequence: u64,
        globals: &[u64],
        hashes: StateHashes,
    ) -> Result<(), ActorError> {
        self.set_globals(globals)?;
        self.sequence = sequence;
        self.hashes = hashes;
        self.start_tracking();
        Ok(())
    }

    /// The hashes of the state at its latest checkpoint.
    pub fn hashes(&self) -> &StateHashes {
        &self.hashes
    }

    /// The actor's id.
    pub fn id(&self) -> ActorId {
        self.id
    }

    /// The sequence of its last checkpoint (0 before the first).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Bytes of linear memory.
    pub fn memory_bytes(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    /// Brings a restored, paused actor forward by one verified checkpoint
    /// (`hashes`: the state hashes the store computed for it) without
    /// copying what it already has: a migration's target applies the final
    /// delta this way, so the pause costs the pages that changed.
    pub fn apply(&mut self, c: &ActorCheckpoint, hashes: StateHashes) -> Result<(), ActorError> {
        let delta = &c.state;
        if delta.base != Some(self.sequence) || c.actor_id != self.id {
            return Err(ActorError::State(format!(
                "checkpoint {} on {:?} does not follow {}",
                c.sequence, delta.base, self.sequence
            )));
        }
        if delta.globals.len() != self.globals.len() {
            return Err(ActorError::State("globals do not fit the module".into()));
        }
        let size = usize::try_from(delta.memory_bytes)
            .map_err(|_| ActorError::State("memory size".into()))?;
        if size < self.memory.data_size(&self.store) {
            return Err(ActorError::State("memory shrinks".into()));
        }
        self.grow_to(size)?;
        let memory = self.memory.data_mut(&mut self.store);
        for (i, page) in delta.iter_pages() {
            let at = i as usize * PAGE;
            memory[at..at + PAGE].copy_from_slice(page);
        }
        self.set_globals(&delta.globals)?;
        self.sequence = c.sequence;
        self.hashes = hashes;
        self.admission = Admission::from_cursors(c.cursors.clone());
        if let Tracking::Kernel { since, .. } = &mut self.tracking {
            // The pages just written count as written since this checkpoint:
            // the next delta carries them again, which is redundant, not wrong.
            *since = c.sequence;
        }
        Ok(())
    }

    /// Grows linear memory to at least `bytes`.
    fn grow_to(&mut self, bytes: usize) -> Result<(), ActorError> {
        let have = self.memory.data_size(&self.store);
        if bytes <= have {
            return Ok(());
        }
        let grow = ((bytes - have) as u64).div_ceil(crate::state::WASM_PAGE);
        self.memory
            .grow(&mut self.store, grow)
            .map_err(|e| ActorError::State(format!("{e:#}")))?;
        Ok(())
    }

    /// Sets the exported mutable globals from their bits.
    fn set_globals(&mut self, bits: &[u64]) -> Result<(), ActorError> {
        for (g, bits) in self.globals.iter().zip(bits) {
            let val = match g.ty(&self.store).content() {
                t if t.is_i32() => Val::I32(*bits as u32 as i32),
                t if t.is_i64() => Val::I64(*bits as i64),
                t if t.is_f32() => Val::F32(*bits as u32),
                _ => Val::F64(*bits),
            };
            g.set(&mut self.store, val).map_err(ActorError::Wasm)?;
        }
        Ok(())
    }

    /// Queues a message if it is its sender's next; a duplicate is
    /// acknowledged without being queued again (see [`crate::delivery`]).
    /// Refused when the mailbox is full or the message is out of order.
    pub fn deliver(&mut self, message: Envelope) -> Result<Delivery, ActorError> {
        if message.payload.len() > MAX_MESSAGE {
            return Err(ActorError::MessageSize(message.payload.len()));
        }
        if self.mailbox.len() >= self.config.mailbox_capacity {
            return Err(ActorError::MailboxFull(self.mailbox.len()));
        }
        let d = self.admission.admit(&message)?;
        if d == Delivery::Queued {
            self.mailbox.push_back(message);
        }
        Ok(d)
    }

    /// Takes the queued messages out (a paused actor that migrates carries
    /// them to its new executor).
    pub fn take_mailbox(&mut self) -> Vec<Envelope> {
        self.mailbox.drain(..).collect()
    }

    /// The last message handled from each sender.
    pub fn cursors(&self) -> &Cursors {
        self.admission.cursors()
    }

    /// Messages waiting.
    pub fn queued(&self) -> usize {
        self.mailbox.len()
    }

    /// Stops handling messages (between two); the mailbox keeps filling.
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Handles messages again.
    pub fn resume(&mut self) {
        self.paused = false;
    }

    /// Whether the actor is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Handles the next queued message, unless paused or idle, and gives it
    /// back with its answer. A message that traps counts as handled: the
    /// trap is its answer, and running it again would trap again.
    pub fn step(&mut self) -> Option<(Envelope, Result<Vec<u8>, ActorError>)> {
        if self.paused {
            return None;
        }
        let message = self.mailbox.pop_front()?;
        let reply = self.call(&message.payload);
        self.admission.handled(&message);
        Some((message, reply))
    }

    /// Runs one message through the actor now, outside any sender's order
    /// (the executor's own reads, and tests).
    pub fn call(&mut self, message: &[u8]) -> Result<Vec<u8>, ActorError> {
        self.check_inbox(message.len())?;
        self.memory.data_mut(&mut self.store)[self.inbox..self.inbox + message.len()]
            .copy_from_slice(message);
        self.store
            .set_fuel(self.config.fuel_per_message)
            .map_err(ActorError::Wasm)?;
        let n = self
            .handle
            .call(&mut self.store, message.len() as i32)
            .map_err(wasm_error)?;
        if n < 0 {
            return Err(ActorError::Refused(n));
        }
        self.check_inbox(n as usize)?;
        Ok(self.memory.data(&self.store)[self.inbox..self.inbox + n as usize].to_vec())
    }

    fn check_inbox(&self, len: usize) -> Result<(), ActorError> {
        let size = self.memory.data_size(&self.store);
        if len > MAX_MESSAGE || self.inbox.saturating_add(len) > size {
            return Err(ActorError::MessageSize(len));
        }
        Ok(())
    }

    fn global_bits(&mut self) -> Vec<u64> {
        self.globals
            .iter()
            .map(|g| match g.get(&mut self.store) {
                Val::I32(v) => v as u32 as u64,
                Val::I64(v) => v as u64,
                Val::F32(v) => u64::from(v),
                Val::F64(v) => v,
                _ => 0,
            })
            .collect()
    }

    /// (Re)starts kernel write tracking over all of memory.
    fn start_tracking(&mut self) {
        let base = self.memory.data_ptr(&self.store) as usize;
        let len = self.memory.data_size(&self.store);
        self.tracking = match WriteTracker::start(base, len) {
            Ok(t) => Tracking::Kernel {
                base,
                since: self.sequence,
                trackers: vec![(0, t)],
                tracked_bytes: len,
            },
            Err(e) => {
                tracing::warn!(actor = %self.id, error = %e, "no kernel write tracking: checkpoints will be full");
                Tracking::None
            }
        };
    }

    /// The state since the last checkpoint: the written pages where the
    /// kernel tracked them, else all of it.
    fn capture(&mut self) -> Result<StateDelta, ActorError> {
        let globals = self.global_bits();
        let size = self.memory.data_size(&self.store);
        let now_at = self.memory.data_ptr(&self.store) as usize;
        let moved = matches!(self.tracking, Tracking::Kernel { base, .. } if base != now_at);
        if moved {
            // Growth moved linear memory: the trackers watch the old mapping.
            self.tracking = Tracking::None;
        }
        let Tracking::Kernel {
            since,
            trackers,
            tracked_bytes,
            ..
        } = &mut self.tracking
        else {
            let full = StateDelta::full(self.memory.data(&self.store), globals);
            self.start_tracking();
            return Ok(full);
        };
        let mut written = Vec::new();
        for (offset, t) in trackers.iter_mut() {
            let first = (*offset / PAGE) as u32;
            t.take_written(|p| written.push(first + p as u32))
                .map_err(|e| ActorError::State(e.to_string()))?;
        }
        written.sort_unstable();
        let mut delta = StateDelta {
            base: Some(*since),
            memory_bytes: size as u64,
            globals,
            ..Default::default()
        };
        let memory = self.memory.data(&self.store);
        for p in written {
            let at = p as usize * PAGE;
            delta.push_page(p, &memory[at..at + PAGE]);
        }
        // Memory grown since the last checkpoint: its non-zero pages, then track it too.
        if size > *tracked_bytes {
            for (i, page) in memory[*tracked_bytes..].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    delta.push_page((*tracked_bytes / PAGE + i) as u32, page);
                }
            }
            let t = WriteTracker::start(now_at + *tracked_bytes, size - *tracked_bytes)
                .map_err(|e| ActorError::State(e.to_string()))?;
            trackers.push((*tracked_bytes, t));
            *tracked_bytes = size;
        }
        Ok(delta)
    }

    /// Takes a signed checkpoint: the pages written since the last one (all
    /// of them the first time). The actor must be between messages, which
    /// `&mut self` guarantees.
    pub fn checkpoint(&mut self, key: &SigningKey) -> Result<ActorCheckpoint, ActorError> {
        let delta = self.capture()?;
        let hashes = self
            .hashes
            .after(&delta, self.config.max_memory())
            .map_err(|e| ActorError::State(e.to_string()))?;
        self.sequence += 1;
        if let Tracking::Kernel { since, .. } = &mut self.tracking {
            *since = self.sequence;
        }
        let cursors = self.admission.cursors().clone();
        let c = ActorCheckpoint::sign(self.id, self.sequence, hashes.root(), delta, cursors, key);
        self.hashes = hashes;
        Ok(c)
    }

    /// Takes a signed checkpoint of the whole state, whatever was tracked:
    /// what a migration starts with, since the target may hold an older
    /// chain of this actor's checkpoints than the one here.
    pub fn checkpoint_full(&mut self, key: &SigningKey) -> Result<ActorCheckpoint, ActorError> {
        self.tracking = Tracking::None;
        self.checkpoint(key)
    }

    /// The whole state now (for tests and for restores on this executor).
    pub fn image(&mut self) -> StateImage {
        StateImage {
            memory: self.memory.data(&self.store).to_vec(),
            globals: self.global_bits(),
        }
    }
}
