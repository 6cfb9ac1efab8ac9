#include "ccodecs.h"

#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// libpng reports fatal errors through png_error, which longjmps to png_jmpbuf: every entry point sets
// that jump target first, keeps the first error and warning texts, and cleans up before returning.
typedef struct {
    const uint8_t *data;
    size_t length;
    size_t offset;
    char error[256];
    char warning[256];
    int warnings;
} cc_png_state;

static void cc_png_error(png_structp png, png_const_charp text) {
    cc_png_state *state = png_get_error_ptr(png);
    if (state != NULL) snprintf(state->error, sizeof state->error, "%s", text);
    png_longjmp(png, 1);
}

static void cc_png_warning(png_structp png, png_const_charp text) {
    cc_png_state *state = png_get_error_ptr(png);
    if (state == NULL) return;
    if (state->warnings == 0) snprintf(state->warning, sizeof state->warning, "%s", text);
    state->warnings += 1;
}

static void cc_png_read(png_structp png, png_bytep destination, png_size_t count) {
    cc_png_state *state = png_get_io_ptr(png);
    if (state->length - state->offset < count) {
        png_error(png, "truncated PNG (premature end of data)");
        return;
    }
    memcpy(destination, state->data + state->offset, count);
    state->offset += count;
}

static void cc_set(char *message, size_t capacity, const char *text) {
    if (message != NULL && capacity > 0) snprintf(message, capacity, "%s", text);
}

static int cc_png_check_signature(const uint8_t *data, size_t length, char *message, size_t capacity) {
    if (length < 8 || png_sig_cmp((png_const_bytep)data, 0, 8) != 0) {
        cc_set(message, capacity, length < 8 ? "not a PNG file (shorter than the signature)" : "not a PNG file (bad signature)");
        return CC_ERROR;
    }
    return CC_OK;
}

int cc_png_info(const uint8_t *data, size_t length, int *width, int *height, int *bit_depth, int *channels,
                char *message, size_t message_capacity) {
    if (cc_png_check_signature(data, length, message, message_capacity) != CC_OK) return CC_ERROR;
    cc_png_state state = {.data = data, .length = length};
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &state, cc_png_error, cc_png_warning);
    if (png == NULL) { cc_set(message, message_capacity, "out of memory"); return CC_NOMEM; }
    png_infop info = png_create_info_struct(png);
    if (info == NULL) { png_destroy_read_struct(&png, NULL, NULL); cc_set(message, message_capacity, "out of memory"); return CC_NOMEM; }
    if (setjmp(png_jmpbuf(png))) {
        cc_set(message, message_capacity, state.error);
        png_destroy_read_struct(&png, &info, NULL);
        return CC_ERROR;
    }
    png_set_read_fn(png, &state, cc_png_read);
    png_read_info(png, info);
    *width = (int)png_get_image_width(png, info);
    *height = (int)png_get_image_height(png, info);
    *bit_depth = png_get_bit_depth(png, info);
    *channels = png_get_channels(png, info);
    png_destroy_read_struct(&png, &info, NULL);
    return CC_OK;
}

int cc_png_decode_gray(const uint8_t *data, size_t length, void **pixels, int *width, int *height,
                       int *bit_depth, char *message, size_t message_capacity) {
    *pixels = NULL;
    if (cc_png_check_signature(data, length, message, message_capacity) != CC_OK) return CC_ERROR;
    cc_png_state state = {.data = data, .length = length};
    png_bytep volatile buffer = NULL;
    png_bytep *volatile rows = NULL;
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &state, cc_png_error, cc_png_warning);
    if (png == NULL) { cc_set(message, message_capacity, "out of memory"); return CC_NOMEM; }
    png_infop info = png_create_info_struct(png);
    if (info == NULL) { png_destroy_read_struct(&png, NULL, NULL); cc_set(message, message_capacity, "out of memory"); return CC_NOMEM; }
    if (setjmp(png_jmpbuf(png))) {
        cc_set(message, message_capacity, state.error);
        png_destroy_read_struct(&png, &info, NULL);
        free(buffer);
        free(rows);
        return CC_ERROR;
    }
    png_set_read_fn(png, &state, cc_png_read);
    png_read_info(png, info);
    png_uint_32 w = png_get_image_width(png, info), h = png_get_image_height(png, info);
    int depth = png_get_bit_depth(png, info);
    int color = png_get_color_type(png, info);
    if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    if (png_get_valid(png, info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(png);
    if (color & PNG_COLOR_MASK_ALPHA || png_get_valid(png, info, PNG_INFO_tRNS)) png_set_strip_alpha(png);
    if (color == PNG_COLOR_TYPE_RGB || color == PNG_COLOR_TYPE_RGB_ALPHA || color == PNG_COLOR_TYPE_PALETTE)
        png_set_rgb_to_gray_fixed(png, 1, -1, -1);
    int out_depth = depth == 16 ? 16 : 8;
    if (out_depth == 16) {
        const uint16_t probe = 1;
        if (*(const uint8_t *)&probe == 1) png_set_swap(png);  // PNG is big-endian; deliver native order
    }
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
    size_t row_bytes = png_get_rowbytes(png, info);
    size_t expected = (size_t)w * (size_t)(out_depth / 8);
    if (row_bytes != expected) png_error(png, "unsupported PNG layout after conversion to gray");
    buffer = malloc(row_bytes * h);
    rows = malloc(sizeof(png_bytep) * h);
    if (buffer == NULL || rows == NULL) png_error(png, "out of memory");
    for (png_uint_32 y = 0; y < h; y++) rows[y] = buffer + (size_t)y * row_bytes;
    png_read_image(png, rows);
    png_read_end(png, NULL);
    png_destroy_read_struct(&png, &info, NULL);
    free(rows);
    *pixels = buffer;
    *width = (int)w;
    *height = (int)h;
    *bit_depth = out_depth;
    if (state.warnings > 0) {
        cc_set(message, message_capacity, state.warning);
        return CC_CORRUPT;
    }
    return CC_OK;
}

typedef struct {
    uint8_t *data;
    size_t length;
    size_t capacity;
    int failed;
} cc_png_sink;

static void cc_png_write(png_structp png, png_bytep source, png_size_t count) {
    cc_png_sink *sink = png_get_io_ptr(png);
    if (sink->length + count > sink->capacity) {
        size_t capacity = sink->capacity ? sink->capacity * 2 : 65536;
        while (capacity < sink->length + count) capacity *= 2;
        uint8_t *grown = realloc(sink->data, capacity);
        if (grown == NULL) { png_error(png, "out of memory"); return; }
        sink->data = grown;
        sink->capacity = capacity;
    }
    memcpy(sink->data + sink->length, source, count);
    sink->length += count;
}

static void cc_png_flush(png_structp png) { (void)png; }

int cc_png_encode_gray(const void *pixels, int width, int height, int bit_depth,
                       uint8_t **output, size_t *output_length, char *message, size_t message_capacity) {
    *output = NULL;
    *output_length = 0;
    if (bit_depth != 8 && bit_depth != 16) { cc_set(message, message_capacity, "bit depth must be 8 or 16"); return CC_ERROR; }
    cc_png_state state = {0};
    cc_png_sink sink = {0};
    png_bytep *volatile rows = NULL;
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &state, cc_png_error, cc_png_warning);
    if (png == NULL) { cc_set(message, message_capacity, "out of memory"); return CC_NOMEM; }
    png_infop info = png_create_info_struct(png);
    if (info == NULL) { png_destroy_write_struct(&png, NULL); cc_set(message, message_capacity, "out of memory"); return CC_NOMEM; }
    if (setjmp(png_jmpbuf(png))) {
        cc_set(message, message_capacity, state.error);
        png_destroy_write_struct(&png, &info);
        free(rows);
        free(sink.data);
        return CC_ERROR;
    }
    png_set_write_fn(png, &sink, cc_png_write, cc_png_flush);
    png_set_IHDR(png, info, (png_uint_32)width, (png_uint_32)height, bit_depth, PNG_COLOR_TYPE_GRAY,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    if (bit_depth == 16) {
        const uint16_t probe = 1;
        if (*(const uint8_t *)&probe == 1) png_set_swap(png);
    }
    size_t row_bytes = (size_t)width * (size_t)(bit_depth / 8);
    rows = malloc(sizeof(png_bytep) * (size_t)height);
    if (rows == NULL) png_error(png, "out of memory");
    for (int y = 0; y < height; y++) rows[y] = (png_bytep)pixels + (size_t)y * row_bytes;
    png_write_image(png, rows);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    free(rows);
    *output = sink.data;
    *output_length = sink.length;
    return CC_OK;
}
