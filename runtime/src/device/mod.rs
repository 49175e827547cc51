//! The device layer: a CUDA GPU (`Gpu`: context, stream, loaded modules, the launch of any kernel;
//! it knows nothing of attention), the `Backend` a caller picks, the buffers that live on it, the
//! element types, and the leaves that import nothing of ours: `Arch` and CUDA library discovery.

pub(crate) mod arch;
pub(crate) mod backend;
pub(crate) mod dtype;
pub(crate) mod gpu;
pub mod toolkit;
pub(crate) mod view;

pub use arch::Arch;
pub use backend::{Backend, Buffer};
pub use dtype::{Element, Pod};
pub use gpu::{Gpu, SmResources};
pub use view::{Dst, Src, View, ViewMut};
