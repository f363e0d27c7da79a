"""strata: distributed batch feature extraction for transfer learning."""
