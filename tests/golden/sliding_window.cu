// SlidingWindow: lowered from Rust by #[attention_variant]
struct Variant {
  static constexpr bool kSoftmax = true;
  static constexpr bool kHasQuery = false;
  static constexpr bool kHasKey = false;
  static constexpr bool kHasLogits = false;
  static constexpr bool kHasMask = true;
  static constexpr bool kHasOutput = false;
  static constexpr bool kHasSink = false;
  __device__ __forceinline__ static bool mask(const Params& self, const fi::Pos& at) {
    const int q_abs = fi::sub(fi::add(fi::as_i32(at.qo_pos), fi::as_i32(at.kv_len)), fi::as_i32(at.qo_len));
    const int kv_pos = fi::as_i32(at.kv_pos);
    return kv_pos > q_abs || fi::sub(q_abs, kv_pos) < fi::as_i32(self.window);
  }
  __device__ __forceinline__ static fi::Tri mask_tile(const Params& self, const fi::PosRange& at) {
    const fi::Iv r1 = fi::iv_sub<int>(fi::iv_add<int>(fi::iv_cast<int>(at.qo_pos), fi::iv_cast<int>(at.kv_len)), fi::iv_cast<int>(at.qo_len));
    const fi::Iv r2 = fi::iv_cast<int>(at.kv_pos);
    return fi::tri_or(fi::iv_gt(r2, r1), fi::iv_lt(fi::iv_sub<int>(r1, r2), fi::iv_point(fi::as_i32(self.window))));
  }
};
