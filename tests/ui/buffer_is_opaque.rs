// A buffer is made only by a backend, so its length is its allocation's.
use ferrinfer::prelude::*;

fn main() {
    let _ = Buffer::<f32>::Host(vec![0.0; 4]);
}
