//! The device layer: a CUDA GPU (`Gpu`: context, stream, loaded kernels, launches of any kernel; it
//! knows nothing of attention), the `Backend` a caller picks, the buffers that live on it, the
//! element types, and the leaves that import nothing of ours: `Arch` and CUDA library discovery.

pub mod arch;
pub mod backend;
pub mod dtype;
pub mod gpu;
pub mod toolkit;

pub use arch::Arch;
pub use backend::{Backend, Buffer};
pub use dtype::Element;
pub use gpu::{Gpu, SmResources};
