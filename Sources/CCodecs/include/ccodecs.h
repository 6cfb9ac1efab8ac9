// JPEG (libjpeg-turbo) and PNG (libpng) decoding and encoding with the libraries' setjmp/longjmp
// error handling kept inside C. Every function returns a status and, on failure, a NUL-terminated
// message in `message` (capacity `message_capacity`); Swift never sees a longjmp.
#ifndef CCODECS_H
#define CCODECS_H

#include <stddef.h>
#include <stdint.h>

enum {
    CC_OK = 0,
    CC_ERROR = 1,    // the library reported a fatal error; nothing was decoded
    CC_CORRUPT = 2,  // decoded, but the library warned that the data is damaged (e.g. truncated)
    CC_NOMEM = 3,
};

/// Reads the JPEG header: size and number of components.
int cc_jpeg_info(const uint8_t *data, size_t length, int *width, int *height, int *components,
                 char *message, size_t message_capacity);

/// Decodes a JPEG to 8-bit grayscale. libjpeg-turbo scales in the DCT domain by the largest of 1/8,
/// 1/4, 1/2 whose output still covers min_width x min_height (0, 0 = full size).
/// On CC_OK or CC_CORRUPT, *pixels is a malloc'ed width*height buffer that the caller frees with cc_free.
int cc_jpeg_decode_gray(const uint8_t *data, size_t length, int min_width, int min_height,
                        uint8_t **pixels, int *width, int *height, char *message, size_t message_capacity);

/// Encodes 8-bit grayscale pixels as a baseline JPEG; *output is malloc'ed (free with cc_free).
int cc_jpeg_encode_gray(const uint8_t *pixels, int width, int height, int quality,
                        uint8_t **output, size_t *output_length, char *message, size_t message_capacity);

/// Reads the PNG header: size, bit depth and channels of the stored image.
int cc_png_info(const uint8_t *data, size_t length, int *width, int *height, int *bit_depth, int *channels,
                char *message, size_t message_capacity);

/// Decodes a PNG (gray, gray+alpha, RGB, RGBA, palette; 1-16 bit) to one gray channel. The output keeps
/// 16-bit samples when the file has them (*bit_depth = 16, native-endian uint16) and is 8-bit otherwise.
/// RGB is converted with the ITU-R BT.709-like weights libpng uses by default; alpha is dropped.
int cc_png_decode_gray(const uint8_t *data, size_t length, void **pixels, int *width, int *height,
                       int *bit_depth, char *message, size_t message_capacity);

/// Encodes gray pixels (8-bit, or native-endian 16-bit when bit_depth == 16) as a PNG.
int cc_png_encode_gray(const void *pixels, int width, int height, int bit_depth,
                       uint8_t **output, size_t *output_length, char *message, size_t message_capacity);

void cc_free(void *pointer);

#endif
