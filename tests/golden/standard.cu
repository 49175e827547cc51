// Standard: lowered from Rust by #[attention_variant]
struct Variant {
  static constexpr bool kSoftmax = true;
  static constexpr bool kHasQuery = false;
  static constexpr bool kHasKey = false;
  static constexpr bool kHasLogits = false;
  static constexpr bool kHasMask = false;
  static constexpr bool kHasOutput = false;
  static constexpr bool kHasSink = false;
};
