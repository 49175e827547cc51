//! CPU reference backend: attention with any variant, accumulating in f64. The oracle of every GPU test.
